"""The one exception type that means "your input is wrong".

A config value, a path, a dataset, an image file or a workdir that cannot
work raises `InputError` with one paragraph naming the cause and the fix;
`main.py` prints that paragraph alone. Every other exception is a bug or an
environment failure and keeps its traceback, which whoever debugs it needs,
but for a full disk (`OutOfSpaceError`): freeing space and rerunning is the
whole fix, and the paragraph says where.
"""


class InputError(ValueError):
  """Bad input, reported as one paragraph without a traceback."""


class OutOfSpaceError(InputError):
  """A write found its disk full: one paragraph naming the path and how the
  rerun resumes."""
