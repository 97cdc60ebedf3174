"""An ``argparse.ArgumentParser`` whose long flags take both spellings, ``--flag_name`` and ``--flag-name``.

The HF-dataclass subcommands (``train``, ``bench``, ``diagnose``) get this from ``transformers.HfArgumentParser``;
the plain-argparse ones (``eval``, ``demo``) use this class so every subcommand accepts the same spellings.
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """``add_argument("--seq-len")`` also registers ``--seq_len`` (and the reverse); ``dest`` is unchanged."""

    def add_argument(self, *names, **kwargs):
        spelled = list(names)
        for name in names:
            if name.startswith("--") and ("-" in name[2:] or "_" in name[2:]):
                body = name[2:]
                for other in ("--" + body.replace("_", "-"), "--" + body.replace("-", "_")):
                    if other not in spelled:
                        spelled.append(other)
        return super().add_argument(*spelled, **kwargs)


def explain_negations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``HfArgumentParser``'s generated ``--no_X`` flags their own help.

    For a boolean field defaulting to True, transformers adds ``--no_X`` with a copy of ``X``'s help and
    "(default: False)", which reads as the opposite of what the flag does."""
    helps = {a.dest: a.help for a in parser._actions if a.option_strings and not a.option_strings[0].startswith("--no")}
    for action in parser._actions:
        if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
            what = helps.get(action.dest)
            action.help = f"turn off --{action.dest}" + (f" ({what})" if what else "")
            action.default = argparse.SUPPRESS  # --X's own default stands; the help shows no misleading default
    return parser
