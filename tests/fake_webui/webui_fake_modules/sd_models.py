"""Checkpoint registry: `checkpoints_list`, `checkpoint_tiles()`, `get_closet_checkpoint_match()` (§4.1).

As in WebUI 1.10.1: a title carries ``[shorthash]`` only once the file's sha256 is known (a checkpoint that was
never loaded or hashed is listed by its bare name), the aliases include the file name and the name without
extension, and the tiles keep registration order.
"""

import os
import re

_CHECKSUM = re.compile(r" \[\w+\]$")


class CheckpointInfo:
    def __init__(self, filename, shorthash=None):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.model_name = self.name_for_extra
        self.shorthash = shorthash
        self.title = self.name if shorthash is None else f"{self.name} [{shorthash}]"
        self.ids = [self.model_name, self.title, self.name, self.name_for_extra]
        if shorthash:
            self.ids += [shorthash, f"{self.name_for_extra} [{shorthash}]"]


checkpoints_list: dict = {}
checkpoint_aliases: dict = {}


def register(filename, shorthash="0123456789"):
    info = CheckpointInfo(filename, shorthash)
    checkpoints_list[info.title] = info
    for alias in info.ids:
        checkpoint_aliases[alias] = info
    return info


def checkpoint_tiles(use_short=False):
    return [info.title for info in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    for search in (search_string, _CHECKSUM.sub("", search_string)):
        found = sorted((info for info in checkpoints_list.values() if search in info.title),
                       key=lambda info: len(info.title))
        if found:
            return found[0]
    return None
