"""segtune training core: data, modeling, engine (trainer), evaluation. Entry scripts live beside it."""

import os

# No model hub is reachable from training machines: never let a library try one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
