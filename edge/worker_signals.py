"""The analysis workers ignore the stop signal, from the moment they are forked.

Imported only where the workers live: by their fork server (``edge.workers`` preloads it there, so every
worker inherits it at birth) and by each worker's loop (a no-op once inherited). Never by the agent.

Why: systemd's SIGTERM at a stop, like a terminal's Ctrl-C, reaches every process of the service at once. The
agent finishes and stores the frames in hand, then stops its workers itself; a worker that died of the signal
first, even one still starting up, would lose its frame. The fork server ignores it too, and ends with the agent
(multiprocessing closes it when the agent exits).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
