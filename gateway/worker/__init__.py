"""The extra job processes of `gateway run --workers N`: each a whole gateway in the
same consumer group (`gateway.worker.main`), started and supervised by the gateway
process (`gateway.worker.pool`), which answers its API process for all of them
(`gateway.worker.combine`), over one channel each whose messages are defined once
(`gateway.worker.channel`).
"""
