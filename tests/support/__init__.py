"""Helpers shared by the tests (and, for tmux, by the benchmarks): one module per concern.

Imported as `support.<module>`: pytest puts tests/ on sys.path (tests/ is not a package), as it does for
faults_support; benchmarks/_common.py adds tests/ to sys.path itself."""
