"""Modal screens: the branch dialog and the help screen."""
