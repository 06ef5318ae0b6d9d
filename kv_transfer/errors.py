"""Transfer errors. Each names the gRPC status it maps to, so the receiver's logic stays gRPC-free."""
from __future__ import annotations


class KVTransferError(Exception):
    """A KV transfer failed. `status` is a `grpc.StatusCode` member name, e.g. "DATA_LOSS"."""

    status = "INTERNAL"

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class DataLoss(KVTransferError):
    """Bytes were lost or corrupted: checksum or length mismatch, truncated stream."""

    status = "DATA_LOSS"


class MalformedFrame(KVTransferError):
    """A header that cannot be valid: bad schema, dtype or shape, blocks not reserved or sent twice."""

    status = "INVALID_ARGUMENT"


class UnknownRequest(KVTransferError):
    """No pending reservation for this request id (never expected, or already finished)."""

    status = "NOT_FOUND"


class TransferClosed(KVTransferError):
    """The reservation was aborted or failed on the receiver; its frames are dropped."""

    status = "ABORTED"


class DuplicateStream(KVTransferError):
    """A second stream tried to claim a reservation that another stream already owns."""

    status = "ALREADY_EXISTS"
