"""Fixtures every test module can use: the S3 servers (moto, SeaweedFS) from tests.support.

Imported here, not redefined, so there is one definition of each server fixture.
"""

from __future__ import annotations

from tests.support.servers import moto_s3, seaweedfs  # noqa: F401 - pytest finds fixtures by name
