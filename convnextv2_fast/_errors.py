"""Exception type for bad constructor / call arguments.

``mmpretrain.ConvNeXt`` validates its arguments with ``assert``; code written
against it (including mmpretrain's own tests) expects ``AssertionError``.  Users
of a library expect ``ValueError``.  ``ArgumentError`` is both, and its message
always names the offending argument.
"""


class ArgumentError(AssertionError, ValueError):
    """Invalid argument; message names the argument and what was expected."""
