"""NBD for Ferry: an asyncio server exporting backends, and a client backend for any NBD server.

Modules: ``protocol`` (wire constants and layouts, the Ferry checksum
extension), ``channel`` (socket I/O and addresses), ``server_handshake`` /
``transmission`` / ``checksums`` / ``server`` (the server), ``client_handshake`` /
``client`` (one connection) and ``backend`` (``NbdBackend``, splitting,
paging and reconnecting).
"""

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress, UnixAddress, nbd_url
from appliance.datapath.nbd.client import NbdClient
from appliance.datapath.nbd.server import NbdServer

__all__ = [
    "NbdAddress",
    "NbdBackend",
    "NbdClient",
    "NbdServer",
    "TcpAddress",
    "UnixAddress",
    "nbd_url",
]
