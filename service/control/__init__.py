"""The control plane: the files a server's workers share (the control directory), the follower that
moves a worker to the version ordered there, and the mover that orders and waits. Knows nothing of
HTTP or of how a model runs: it is handed `load` and `install`."""
