"""The data tools' command-line parser: every multi-word flag in both spellings.

`launch/train.py` spells flags with underscores (`--gin_param`), these tools used dashes
(`--text-key`); `ArgumentParser` here accepts both for every `--multi-word` flag, so
`--gin_param` / `--gin-param`, `--text_key` / `--text-key` … all work. Help shows the first.
"""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser adding the other spelling (`-` ↔ `_`) of each long option."""

    def add_argument(self, *names, **kwargs):
        extra = []
        for name in names:
            if name.startswith("--"):
                for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if alt not in names and alt not in extra:
                        extra.append(alt)
        if extra and "dest" not in kwargs:  # argparse would name dest after the first long flag anyway
            kwargs["dest"] = next(n for n in names if n.startswith("--"))[2:].replace("-", "_")
        action = super().add_argument(*names, *extra, **kwargs)
        if extra:  # help lists the flag once, as it was declared
            action.option_strings = [n for n in action.option_strings if n not in extra] or action.option_strings
        return action

    def _get_option_tuples(self, option_string):  # an abbreviation matching both spellings is not ambiguous
        seen, out = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:
                seen.add(id(t[0]))
                out.append(t)
        return out
