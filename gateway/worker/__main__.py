"""`python -m gateway.worker CHANNEL_FD`: a worker process."""

from gateway.worker.main import main

main()
