"""An OTLP/HTTP sink for benchmarks: accepts POST /v1/traces and counts bytes and requests.

`python -m benchmarks.otlp_sink --port 4318` gives a traced gateway somewhere real to send its
spans, so the cost of exporting (protobuf encoding, HTTP in the exporter's thread) is measured.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318)
    args = p.parse_args()
    seen = {"requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        seen["requests"] += 1
        seen["bytes"] += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(seen)

    app = web.Application()
    app.add_routes([web.post("/v1/traces", traces), web.get("/stats", stats)])
    asyncio.run(web._run_app(app, host=args.host, port=args.port, print=None))


if __name__ == "__main__":
    main()
