"""Speed machinery: compiled steps shared between runs (workspaces, step_sharing) and fused runs
(several runs in one compiled step). The core library never imports it."""
