"""The committed stubs in services/pb are what proto/specd.proto generates."""

from services.protogen import stale_stubs


def test_committed_stubs_are_current():
    assert stale_stubs() == [], "run `make protos` (python -m services.protogen) and commit the stubs"
