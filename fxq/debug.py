"""Debug switches, all read from the environment in one place.

FXQ_DEBUG=1 logs each pass with its time; FXQ_DEBUG=2 also prints the graph after each pass.
FXQ_CHECK=1 lints the graph after every pass (PassManager's run_checks_after_each_pass).
"""

import logging
import os

__all__ = ["DEBUG", "CHECK", "log"]

DEBUG = int(os.environ.get("FXQ_DEBUG", "0") or 0)
CHECK = os.environ.get("FXQ_CHECK", "0") not in ("", "0")

log = logging.getLogger("fxq")
if DEBUG and not log.handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("[fxq] %(message)s"))
    log.addHandler(_h)
    log.setLevel(logging.DEBUG)
