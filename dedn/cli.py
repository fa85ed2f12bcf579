"""What every entry point's argument parser shares: help text as written, each option with its default."""
from __future__ import annotations

import argparse
import copy

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (examples keep their layout); every option that has a
    default shows it. Flags (default off) and options without a value by default (None or "":
    computed, or required) are left as their help says; so is a help that names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or "default" in text  # the help names its default already
                or action.default in (None, "", argparse.SUPPRESS) or isinstance(action.default, bool)):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._get_help_string(action) != action.help:  # an option without help: its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

