"""A local GCS for the tests: gcp-storage-emulator plus a TLS proxy, offline.

Every library the project reaches gs:// through is pointed at one emulator on
127.0.0.1 (`gcp-storage-emulator`, in memory, one bucket), each the way it
allows:

- tensorstore (orbax's arrays) reads `TENSORSTORE_GCS_HTTP_URL` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING`: it talks to the emulator directly.
- array_record (tfds' ArrayRecord reader, both storages) reads gs:// with
  google-cloud-cpp, which reads `CLOUD_STORAGE_EMULATOR_ENDPOINT`.
- google-cloud-storage (orbax asks it whether a bucket has a hierarchical
  namespace, and deletes through it) reads `STORAGE_EMULATOR_HOST`.
- `tf.io.gfile`, and so `etils.epath` (its gs:// backend whenever tensorflow
  is installed), tfds and every workdir file, has no endpoint setting: its
  GCS filesystem always calls https://www.googleapis.com (JSON API,
  uploads) and https://storage.googleapis.com (reads). It does honour
  libcurl's `https_proxy`/`http_proxy`, `CURL_CA_BUNDLE` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING`. So this process also runs a proxy that
  answers CONNECT for those hosts with a certificate of a throw-away CA
  (`trustme`), decrypts, and forwards the plain HTTP to the emulator; plain
  `http://` requests (the resumable-upload URLs the emulator hands out) are
  forwarded too. Nothing leaves 127.0.0.1.

What the emulator lacks, patched here (in this process only): it fails a
media upload with an empty body (TF writes one for each directory it
makes), reads `Content-Length` before `Transfer-Encoding: chunked` (TF sends
both), and sends no `x-goog-generation` header with an object's bytes
(tensorstore needs it). It also ignores `ifGenerationMatch` preconditions
(tensorstore's and TF's conditional writes always succeed; one writer per
object, as in these tests, never needs them). Its server answers one request
at a time over HTTP/1.0, so curl would wait up to a second (its default)
before each upload's body (`Expect: 100-continue`); here it runs threaded,
answers HTTP/1.1 (the 100 at once), closes each connection after one
request, and serialises the handlers behind a lock (its storage is not
thread-safe).

The `gcs` fixture starts one such process per test session (pytest-xdist
worker) on free ports and stops it at the end; tests pass `gcs.env` to the
processes they start, or `gcs.use(monkeypatch)` for in-process calls. The
variables are set only there, never in package code. As a script:
`python -m tests.gcs_emulator --port=P --proxy_port=Q --ca=FILE --bucket=B`
writes the CA to FILE, prints `ready` and serves until killed.
"""

import argparse
import dataclasses
import functools
from http import HTTPStatus
import http.server
import logging
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import urllib.parse

import portpicker
import pytest

BUCKET = 'perceiver-test'

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com',
                'oauth2.googleapis.com')


def environment(port, proxy_port, ca_file):
  """What a process needs to reach the emulator (see the module docstring)."""
  proxy = f'http://127.0.0.1:{proxy_port}'
  return {
      'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{port}',
      'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{port}',
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': f'http://127.0.0.1:{port}',
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator-token',
      'https_proxy': proxy, 'HTTPS_PROXY': proxy, 'http_proxy': proxy,
      # tensorstore's emulator URL, jax.distributed's gRPC: never proxied.
      'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
      'CURL_CA_BUNDLE': ca_file,
      # Metadata-server probes (TF, tensorstore) would time out offline.
      'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': '127.0.0.1:1',
  }


def _serve_emulator(port, bucket):
  """The emulator's handlers, fixed where TF needs it (module docstring)."""
  # pylint: disable=g-import-not-at-top,protected-access
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.handlers import buckets
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.storage import Storage
  read_raw_data = emulator._read_raw_data
  media_upload = objects._media_upload

  def read_chunked_first(handler):
    # TF sends `Content-Length` beside `Transfer-Encoding: chunked`; HTTP
    # says the chunks count.
    if handler.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      del handler.headers['Content-Length']
    return read_raw_data(handler)

  def media_upload_of_empty_objects(request, response, storage):
    if request.data is None:  # An empty body: TF's `dir/` markers.
      request._data = b''
    return media_upload(request, response, storage)

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    # tensorstore reads an object's generation from these headers.
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'],
                                 request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj.get('metageneration', '1')

  emulator._read_raw_data = read_chunked_first
  objects._media_upload = media_upload_of_empty_objects
  objects.download = download_with_generation  # For `?alt=media` reads.
  emulator.HANDLERS = tuple(
      (pattern, {method: download_with_generation if f is download else f
                 for method, f in handlers.items()})
      for pattern, handlers in emulator.HANDLERS)
  # pylint: enable=g-import-not-at-top,protected-access
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  lock = threading.Lock()

  class Handler(emulator.RequestHandler):
    # HTTP/1.1 answers `Expect: 100-continue` at once (curl otherwise waits
    # a second before each upload's body); one request per connection.
    protocol_version = 'HTTP/1.1'

    def send_response(self, *args, **kwargs):
      super().send_response(*args, **kwargs)
      self.send_header('Connection', 'close')

  for name in ('do_GET', 'do_POST', 'do_PUT', 'do_DELETE', 'do_PATCH'):
    def locked(self, method=getattr(emulator.RequestHandler, name)):
      with lock:  # The emulator's storage is not thread-safe.
        method(self)
    setattr(Handler, name, locked)

  class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

  httpd = Server(('127.0.0.1', port), functools.partial(Handler, storage))
  threading.Thread(target=httpd.serve_forever, daemon=True).start()


def _pipe(source, sink):
  try:
    while data := source.recv(65536):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for s in (source, sink):
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


class _ProxyHandler(socketserver.StreamRequestHandler):
  """CONNECT: TLS with the test CA's certificate, then bytes to the emulator.
  Plain requests: the absolute URL rewritten to a path, then bytes."""
  rbufsize = 0  # Nothing read past the headers stays in a buffer.
  upstream_port = None
  tls = None

  def handle(self):
    line = self.rfile.readline(65537).decode('latin-1')
    headers = []
    while (header := self.rfile.readline(65537)) not in (b'\r\n', b'\n', b''):
      headers.append(header)
    try:
      method, target, version = line.split()
    except ValueError:
      return
    upstream = socket.create_connection(('127.0.0.1', self.upstream_port))
    client = self.connection
    if method == 'CONNECT':
      client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
      client = self.tls.wrap_socket(client, server_side=True)
    else:
      url = urllib.parse.urlsplit(target)
      path = url.path + (f'?{url.query}' if url.query else '')
      upstream.sendall(f'{method} {path} {version}\r\n'.encode('latin-1')
                       + b''.join(headers) + b'\r\n')
    back = threading.Thread(target=_pipe, args=(upstream, client),
                            daemon=True)
    back.start()
    _pipe(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve_proxy(proxy_port, port, ca_file):
  import trustme  # pylint: disable=g-import-not-at-top
  ca = trustme.CA()
  ca.cert_pem.write_to_path(ca_file)
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  ca.issue_cert(*GOOGLE_HOSTS).configure_cert(tls)

  class Proxy(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

  handler = type('Handler', (_ProxyHandler,),
                 {'upstream_port': port, 'tls': tls})
  proxy = Proxy(('127.0.0.1', proxy_port), handler)
  threading.Thread(target=proxy.serve_forever, daemon=True).start()


@dataclasses.dataclass(frozen=True)
class Gcs:
  """A running emulator: `gs://BUCKET` and the variables that reach it."""
  bucket: str  # 'gs://perceiver-test'
  env: dict

  def use(self, monkeypatch):
    """Points this process's libraries at the emulator for one test."""
    for name, value in self.env.items():
      monkeypatch.setenv(name, value)


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """One emulator for the session, on 127.0.0.1; stopped at its end."""
  port = portpicker.pick_unused_port()
  proxy_port = portpicker.pick_unused_port()
  ca_file = str(tmp_path_factory.mktemp('gcs') / 'ca.pem')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, '-m', 'tests.gcs_emulator', f'--port={port}',
       f'--proxy_port={proxy_port}', f'--ca={ca_file}', f'--bucket={BUCKET}'],
      cwd=root, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'ready', 'emulator did not start'
    yield Gcs(f'gs://{BUCKET}', environment(port, proxy_port, ca_file))
  finally:
    proc.kill()
    proc.wait()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--proxy_port', type=int, required=True)
  parser.add_argument('--ca', required=True)
  parser.add_argument('--bucket', required=True)
  args = parser.parse_args()
  # The emulator logs every missing object, which clients probe for.
  logging.basicConfig(level=logging.CRITICAL)
  _serve_emulator(args.port, args.bucket)
  _serve_proxy(args.proxy_port, args.port, args.ca)
  print('ready', flush=True)
  threading.Event().wait()


if __name__ == '__main__':
  sys.exit(main())
