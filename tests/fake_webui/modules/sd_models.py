"""Checkpoint registry: `checkpoints_list`, `checkpoint_tiles()`, `get_closet_checkpoint_match()` (§4.1)."""

import os


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.model_name = os.path.splitext(self.name)[0]
        self.shorthash = "0123456789"
        self.title = f"{self.name} [{self.shorthash}]"
        self.ids = [self.model_name, self.name, self.title]


checkpoints_list: dict = {}
checkpoint_aliases: dict = {}


def register(filename):
    info = CheckpointInfo(filename)
    checkpoints_list[info.title] = info
    for alias in info.ids:
        checkpoint_aliases[alias] = info
    return info


def checkpoint_tiles(use_short=False):
    return sorted(checkpoints_list)


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    found = sorted((info for info in checkpoints_list.values() if search_string in info.title),
                   key=lambda info: len(info.title))
    return found[0] if found else None
