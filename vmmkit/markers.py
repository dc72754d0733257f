"""Finding a command's output and exit status in a serial console stream."""

from __future__ import annotations


class MarkerStream:
    """Forwards the bytes between two markers of a console stream, keeping the rest as a log.

    A console also carries firmware escape codes and kernel messages; only
    what the command wrote between the start and end markers is output. With
    *with_status*, the end marker is followed by a decimal exit status and
    ``]`` (the default guest's /init writes it so), parsed into ``status``.
    """

    def __init__(self, out, start: bytes, end: bytes, *, with_status: bool = False):
        self.out = out
        self.start, self.end = start, end
        self.with_status = with_status
        self.state = "before"  # before -> inside -> after
        self.pending = b""
        self.log = bytearray()
        self.status: int | None = None
        self._status_text = b""

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of console bytes."""
        data = self.pending + chunk
        self.pending = b""
        if self.state == "before":
            idx = data.find(self.start)
            if idx < 0:
                keep = len(self.start) - 1
                self._log(data[:-keep] if keep else data)
                self.pending = data[-keep:] if keep else b""
                return
            self._log(data[:idx])
            self.state = "inside"
            data = data[idx + len(self.start):]
        if self.state == "inside":
            idx = data.find(self.end)
            if idx >= 0:
                self._emit(data[:idx])
                self.state = "after"
                data = data[idx + len(self.end):]
            else:
                # Hold back a tail that might be the start of the end marker.
                hold = 0
                for n in range(min(len(self.end) - 1, len(data)), 0, -1):
                    if self.end.startswith(data[-n:]):
                        hold = n
                        break
                self._emit(data[:len(data) - hold])
                self.pending = data[len(data) - hold:]
                return
        if self.with_status and self.status is None and self._status_text is not None:
            # The end marker is followed by the decimal status and ']'.
            self._status_text += data
            end = self._status_text.find(b"]")
            if end < 0:
                if len(self._status_text) > 8:
                    # Too long for a status: it is console text, keep it in the log.
                    self._log(self._status_text)
                    self._status_text = None
                return
            digits = self._status_text[:end]
            if digits.isdigit():
                self.status = int(digits)
                data = self._status_text[end + 1:]
            else:
                data = self._status_text
            self._status_text = None
        self._log(data)

    def close(self) -> None:
        """Flush what is held back once the stream ends."""
        if self.state == "inside":
            self._emit(self.pending)
        else:
            # Before the start marker the held-back tail is console text (often
            # the end of a panic message); after the end marker, so is an
            # unterminated status.
            self._log(self.pending)
            if self.status is None and self._status_text:
                self._log(self._status_text)
                self._status_text = None
        self.pending = b""

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.out.flush()

    def _log(self, data: bytes) -> None:
        self.log += data
        del self.log[:-65536]
