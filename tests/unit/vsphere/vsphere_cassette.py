"""How the cassettes are recorded and replayed (shared by record.py and the tests)."""

import re
from pathlib import Path

import vcr

CASSETTES = Path(__file__).resolve().parent / "cassettes"
META = CASSETTES / "meta.json"
PASSWORD = re.compile(rb"(<password[^>]*>).*?(</password>)", re.S)


def scrub_request(request):
    if request.body:
        body = request.body if isinstance(request.body, bytes) else request.body.encode()
        request.body = PASSWORD.sub(rb"\1(scrubbed)\2", body)
    return request


def _pyvmomi_patches():
    """pyVmomi binds http.client's connection classes at import, out of vcrpy's default reach."""
    import pyVim.connect
    import pyVmomi.SoapAdapter
    from vcr.stubs import VCRHTTPConnection, VCRHTTPSConnection

    return tuple(
        (module, name, stub)
        for module in (pyVmomi.SoapAdapter, pyVim.connect)
        for name, stub in (("HTTPConnection", VCRHTTPConnection), ("HTTPSConnection", VCRHTTPSConnection))
    )


def make_vcr():
    # Every SOAP call is POST /sdk: requests are matched in the recorded order, each played once
    # (use_cassette's allow_playback_repeats stays False).
    return vcr.VCR(
        before_record_request=scrub_request,
        filter_headers=["cookie", "authorization", "vmware-api-session-id"],  # vmware-api-session-id: the vAPI token
        decode_compressed_response=True,
        custom_patches=_pyvmomi_patches(),
        match_on=["method", "scheme", "host", "port", "path", "query"],
    )
