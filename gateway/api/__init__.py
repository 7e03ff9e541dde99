"""The HTTP side of a replica, in a process of its own: the tenant API and the operators'
listener (`gateway.api.main`), fed and supervised by the gateway process
(`gateway.api.supervisor`) over one channel whose messages are defined once
(`gateway.api.channel`).

Importing this package loads no HTTP server: the job process imports only the
supervisor and the channel.
"""
