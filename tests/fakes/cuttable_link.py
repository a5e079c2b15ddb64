"""A loopback TCP link between the worker and a model server that a test can cut and restore, and that records requests.

Cutting closes every open connection at once (a stream stops mid-answer, as when a server or
its network goes away) and refuses new ones until the link is restored on the same port.
"""

from __future__ import annotations

import asyncio
import json


class CuttableLink:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0  # chosen at the first start, kept across cuts
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._sent: list[bytearray] = []  # what the client sent, per connection

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> CuttableLink:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        await self._server.wait_closed()

    restore = start

    def requests(self, path: str) -> list[dict]:
        """The JSON bodies of the requests sent to `path`, per connection in order."""
        bodies = []
        for sent in self._sent:
            data = bytes(sent)
            while b"\r\n\r\n" in data:
                head, data = data.split(b"\r\n\r\n", 1)
                lines = head.decode().split("\r\n")
                length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")), 0)
                body, data = data[:length], data[length:]
                if lines[0].split(" ")[1].endswith(path) and body:
                    bodies.append(json.loads(body))
        return bodies

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        sent = bytearray()
        self._sent.append(sent)
        self._open.update((client_writer, server_writer))
        await asyncio.gather(
            self._pipe(client_reader, server_writer, sent), self._pipe(server_reader, client_writer, None),
            return_exceptions=True,
        )
        for writer in (client_writer, server_writer):
            self._open.discard(writer)
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None) -> None:
        while data := await reader.read(65536):
            if record is not None:
                record += data
            writer.write(data)
            await writer.drain()
        writer.transport.abort()
