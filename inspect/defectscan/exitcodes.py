"""Exit statuses of defectscan commands, for schedulers and scripts (click's usage errors are 2)."""

EXIT_OK = 0
# A user error or a failed run: one `Error: ...` line says why.
EXIT_FAILED = 1
# Finished, but some items were left out (files skipped, images in error), each reported.
EXIT_PARTIAL = 3
# Some images were left pending because the machinery failed (a worker lost past the retry
# budget, a full disk): nothing was recorded for them and the next run inspects them.
EXIT_PENDING = 4
# Another runner holds the job's lock: this trigger did nothing (EX_TEMPFAIL).
EXIT_ALREADY_RUNNING = 75
# Stopped by SIGTERM (128 + 15) or SIGINT/Ctrl-C (128 + 2); the next run resumes.
EXIT_INTERRUPTED = 143
EXIT_SIGINT = 130
# The reader of stdout went away (`defectscan ... | head`): 128 + SIGPIPE, as a shell tool killed by it.
EXIT_SIGPIPE = 141
