"""Every exception the product raises on purpose, in one place (torch-free: anyone may import it).

A UserError is about what the user asked for: the CLI prints its message as one line and exits 2, the app
shows it in a notification or banner, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for: shown as one line, exit code 2, never a traceback."""


class ConfigError(UserError):
    """A bad config key, type or value; the message names the key."""


class CheckpointInvalid(UserError):
    """A checkpoint failed verification; the message names the file."""


class CheckpointDeleted(CheckpointInvalid):
    """The checkpoint was deleted (retention on a live run) while being read: not corrupt, gone."""


class RunDamaged(UserError):
    """A run whose run.json is unreadable or fails the schema (core/store/schema.py); names the field."""


class RunLocked(UserError):
    """Another live process holds the run."""


class RunAlreadyFinished(Exception):
    """`train --auto-resume` of a run that already reached its max_steps: nothing to do. The CLI prints the
    message as one line and exits 0 (a supervisor that runs the command again must see success)."""


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed (disk full, permissions); training pauses, nothing older is touched.
    Not a UserError: the engine reports it as a disk fault (core/events.py Failed), not as bad input."""


class ChannelRefused(UserError):
    """A run's control socket answered, but not as the process training that run may: another user's
    process, garbage, or a reply without what it must carry. Nothing was done (exit 1, not bad input)."""


class Busy(UserError):
    """The training process is there but cannot take this client now (too many clients, or no answer in
    time): try again (exit 75, EX_TEMPFAIL)."""
