"""The one error type for bad user input (data files, config, mismatched artifacts).

Stages raise a subclass with a message naming the file or field and what was expected;
``aihpc.stage.rule_log`` turns it into that one line and exit status 1, not a traceback.
"""


class InputError(ValueError):
    """Bad input: the message names the file or field and what was expected."""
