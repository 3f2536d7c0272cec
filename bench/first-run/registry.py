#!/usr/bin/env python3
"""The pull side of the OCI distribution API over plain HTTP, from an OCI layout:
GET /v2/, manifests by tag (index.json's ref.name annotations) or digest, and blobs.
--rate caps each response body at that many bytes per second (0: no cap), to show the
download/unpack overlap at a realistic bandwidth. For benchmarks on loopback only."""
import argparse, http.server, json, os, re, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--rate", type=int, default=0, help="bytes per second per response, 0: no cap")
    args = ap.parse_args()
    blobs = os.path.join(args.layout, "blobs", "sha256")
    index = json.load(open(os.path.join(args.layout, "index.json")))
    tags = {d.get("annotations", {}).get("org.opencontainers.image.ref.name"): d["digest"]
            for d in index["manifests"]}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, code, ctype, body=b"", path=None, size=None):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size if path else len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if path is None:
                self.wfile.write(body)
                return
            start = time.monotonic()
            sent = 0
            with open(path, "rb") as f:
                while chunk := f.read(256 * 1024):
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if args.rate:
                        ahead = sent / args.rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)

        def blob_path(self, digest):
            m = re.fullmatch(r"sha256:([0-9a-f]{64})", digest)
            p = m and os.path.join(blobs, m.group(1))
            return p if p and os.path.isfile(p) else None

        def do_GET(self):
            if self.path == "/v2/":
                return self.reply(200, "application/json", b"{}")
            m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", self.path)
            if not m:
                return self.reply(404, "application/json", b"{}")
            kind, ref = m.group(2), m.group(3)
            if kind == "manifests":
                p = self.blob_path(tags.get(ref, ref))
                if not p:
                    return self.reply(404, "application/json", b"{}")
                body = open(p, "rb").read()
                ctype = json.loads(body).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
                return self.reply(200, ctype, body)
            p = self.blob_path(ref)
            if not p:
                return self.reply(404, "application/json", b"{}")
            self.reply(200, "application/octet-stream", path=p, size=os.path.getsize(p))

        do_HEAD = do_GET

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"registry on 127.0.0.1:{args.port}, rate {args.rate or 'unlimited'} B/s", flush=True)
    srv.serve_forever()

if __name__ == "__main__":
    main()
