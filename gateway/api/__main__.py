"""`python -m gateway.api TENANT_FD OPS_FD CHANNEL_FD`: the API process."""

from gateway.api.main import main

main()
