"""The one exception type a user is meant to see.

A MetarunError is a mistake the user can fix (a setting, a path, a file). The CLI prints its message as
one line, without a traceback, and exits with status 2. Every message names the setting or file and the fix.
"""


class MetarunError(Exception):
    pass
