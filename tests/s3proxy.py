"""A small HTTP proxy in front of moto's S3 server that a test controls, to play the stores and networks
users meet: it can hold requests (a hung lease write), drop the conditional headers (a store that ignores
If-None-Match / If-Match), or answer a status of its own (403, 501). Everything else passes through."""
import http.client
import http.server
import threading

CONDITIONS = ("if-none-match", "if-match")


def is_lease_write(method, path, headers):
    return method == "PUT" and "/locks/shard-" in path


def is_conditional_write(method, path, headers):
    return method == "PUT" and any(h in headers for h in CONDITIONS)


def is_write(method, path, headers):
    return method in ("PUT", "POST", "DELETE")


class S3Proxy:
    """Listens on 127.0.0.1 (url); forwards to `upstream` ("host:port") unless a rule says otherwise."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.drop_conditions = False
        self.answer = None  # (matches(method, path, headers), status, S3 error code)
        self.held = None  # matches(method, path, headers): such requests wait until release()
        self._open = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                what = (self.command, self.path, headers)
                if proxy.answer and proxy.answer[0](*what):
                    _, status, code = proxy.answer
                    return self._reply(status, {"Content-Type": "application/xml"},
                                       f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>"
                                       f"{code} (from the test's proxy)</Message></Error>".encode())
                if proxy.held and proxy.held(*what):
                    proxy._open.wait()
                if proxy.drop_conditions:
                    headers = {k: v for k, v in headers.items() if k not in CONDITIONS}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    sends_body = body or self.command in ("PUT", "POST")
                    conn.request(self.command, self.path, body=body if sends_body else None, headers=headers)
                    got = conn.getresponse()
                    data = got.read()
                    self._reply(got.status, {k: v for k, v in got.getheaders()
                                             if k.lower() not in ("transfer-encoding", "connection", "content-length")},
                                data, self.command == "HEAD" and got.getheader("Content-Length"))
                finally:
                    conn.close()

            def _reply(self, status, headers, data, head_length=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", head_length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hold(self, matches):
        """Requests that match wait (the client sees a hung request) until release()."""
        self._open.clear()
        self.held = matches

    def release(self):
        """Let the held requests through, late: they reach the store now."""
        self.held = None
        self._open.set()

    def stop(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()
