"""Every subcommand's --help of both command lines renders, and says what each flag does and defaults to."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

import gcfg_core.cli
import trainer.cli

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import tiny_config  # noqa: E402

CLIS = {"python -m trainer": trainer.cli, "python -m gcfg_core": gcfg_core.cli}


def subcommands(module) -> dict[str, argparse.ArgumentParser]:
    parser = module.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def rendered_help(module, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


CASES = [(prog, name) for prog, module in CLIS.items() for name in subcommands(module)]


@pytest.mark.parametrize(("prog", "command"), CASES)
def test_every_subcommand_help_renders_and_describes_every_argument(prog, command, capsys):
    module = CLIS[prog]
    text = rendered_help(module, [command, "--help"], capsys)
    assert text.startswith(f"usage: {prog} {command}")
    assert "{'" not in text and "(default: None)" not in text  # e.g. an unescaped % formats argparse's dict
    parser = subcommands(module)[command]
    assert parser.description, f"{command} has no description"
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        shown = parser._get_formatter()._expand_help(action)  # what --help prints for it
        assert shown.strip(), f"{prog} {command}: {action.option_strings or action.dest} has no help"
        if isinstance(action, argparse.BooleanOptionalAction) and command != "resume":
            assert "default: --" in shown, f"{prog} {command}: {action.option_strings} shows no default"


def test_help_renders_percent_signs_and_boolean_defaults(capsys):
    text = " ".join(rendered_help(trainer.cli, ["train", "--help"], capsys).split())
    assert "less memory, ~30% slower. (default: --gradient-checkpointing)" in text
    assert "(default: --no-flip)" in text and "(default: 0 1 2 3)" in text


def test_resume_help_shows_the_jobs_values_and_no_general_defaults(tmp_path, tiny_checkpoint, capsys):
    general = " ".join(rendered_help(trainer.cli, ["resume", "--help"], capsys).split())
    assert "--config" not in general and "(default: 10000)" not in general
    assert "resume JOB_DIR --help" in general and "JOB_DIR the job folder" in general
    assert "fixed for a job" in general and "--resolution" in general

    config = tiny_config(tmp_path, tiny_checkpoint, max_steps=123, learning_rate=3e-4)
    config.save(Path(config.job_dir).mkdir(parents=True) or Path(config.job_dir) / "config.json")
    text = " ".join(rendered_help(trainer.cli, ["resume", config.job_dir, "--help"], capsys).split())
    assert "Training length in optimizer steps. (this job: 123)" in text
    assert "(this job: 0.0003)" in text and "(this job: --gradient-checkpointing)" in text
    assert "--config" not in text
