"""PMI-1 for MPI ranks started by Spark: wire protocol, per-job state, and the server.

Public entry point: :class:`PMIServer`. The protocol functions are pure and usable alone.
"""

from sparkmpi.pmi.auth import PMIAuthError
from sparkmpi.pmi.client import ServerUnreachable, connect_rank, open_link
from sparkmpi.pmi.job import AbortRequest, PMIJob
from sparkmpi.pmi.listener import ListenerLimits
from sparkmpi.pmi.mapping import nodes_from_mapping, process_mapping
from sparkmpi.pmi.protocol import PMICommand, PMIProtocolError, format_command, parse_command
from sparkmpi.pmi.server import PMIServer

__all__ = [
    "AbortRequest",
    "ListenerLimits",
    "PMIAuthError",
    "PMICommand",
    "PMIJob",
    "PMIProtocolError",
    "PMIServer",
    "ServerUnreachable",
    "connect_rank",
    "format_command",
    "nodes_from_mapping",
    "open_link",
    "parse_command",
    "process_mapping",
]
