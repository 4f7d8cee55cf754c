"""Exit statuses of defectscan commands, for schedulers and scripts (click's usage errors are 2)."""

EXIT_OK = 0
# A user error or a failed run: one `Error: ...` line says why.
EXIT_FAILED = 1
# Finished, but some items were left out (files skipped, images in error), each reported.
EXIT_PARTIAL = 3
# Another runner holds the job's lock: this trigger did nothing (EX_TEMPFAIL).
EXIT_ALREADY_RUNNING = 75
# Stopped by SIGTERM (128 + 15); the next run resumes.
EXIT_INTERRUPTED = 143
