"""`--tree DIR` for the bench scripts that compare commits: imported before fxq, it makes `import fxq` load the
source tree DIR (a `git worktree` of an older commit, with fxq/passes and fxq/kernels linked to ../passes and
../kernels) instead of the installed package, so two commits run the same script side by side."""

import sys
from pathlib import Path

if "--tree" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()))
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
