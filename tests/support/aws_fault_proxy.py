"""An HTTP proxy in front of moto_server that fails chosen AWS calls the way AWS does.

Point `kinesis.endpoint_url` at it. `mode` (settable while it runs):

- ``pass``: every request goes to moto unchanged;
- ``throttle``: every Kinesis PutRecords answers 400 ProvisionedThroughputExceededException;
- ``partial``: every PutRecords forwards all but its first record to moto and answers that
  the first failed (ProvisionedThroughputExceededException), as a partly failed put does;
- ``fail_all_records``: PutRecords answers 200 with every record failed (InternalFailure).

Other calls (DynamoDB, other Kinesis actions) always pass.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PUT_RECORDS = "Kinesis_20131202.PutRecords"


class AwsFaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.mode = "pass"
        self.put_calls = 0
        self.failed_records = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                target = self.headers.get("X-Amz-Target", "")
                if target == PUT_RECORDS:
                    proxy.put_calls += 1
                    mode = proxy.mode
                    if mode == "throttle":
                        request = json.loads(body)
                        proxy.failed_records += len(request["Records"])
                        return self._answer(
                            400,
                            {
                                "__type": "ProvisionedThroughputExceededException",
                                "message": "Rate exceeded for shard (injected)",
                            },
                        )
                    if mode == "fail_all_records":
                        request = json.loads(body)
                        n = len(request["Records"])
                        proxy.failed_records += n
                        failed = {"ErrorCode": "InternalFailure", "ErrorMessage": "injected"}
                        return self._answer(200, {"FailedRecordCount": n, "Records": [failed] * n})
                    if mode == "partial":
                        request = json.loads(body)
                        first, rest = request["Records"][0], request["Records"][1:]
                        del first
                        proxy.failed_records += 1
                        records: list[dict[str, Any]] = []
                        if rest:
                            request["Records"] = rest
                            status, answer = self._forward(json.dumps(request).encode())
                            if status != 200:
                                return self._raw(status, answer)
                            records = json.loads(answer)["Records"]
                        failed = {
                            "ErrorCode": "ProvisionedThroughputExceededException",
                            "ErrorMessage": "Rate exceeded for shard (injected)",
                        }
                        return self._answer(
                            200, {"FailedRecordCount": 1, "Records": [failed, *records]}
                        )
                status, answer = self._forward(body)
                self._raw(status, answer)

            def _forward(self, body: bytes) -> tuple[int, bytes]:
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length")
                }
                request = urllib.request.Request(
                    proxy.target + self.path, data=body, headers=headers, method="POST"
                )
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        return response.status, response.read()
                except urllib.error.HTTPError as exc:
                    return exc.code, exc.read()

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                self._raw(status, json.dumps(payload).encode())

            def _raw(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> AwsFaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
