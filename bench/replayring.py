"""A PacketRing stand-in over ring blocks held in memory, for the replay benchmarks
(capture_replay.py, terminate_replay.py): the readers run on blocks laid out as the
kernel fills them, without a socket, so only their own CPU is measured."""

from __future__ import annotations

from vtap_drivers.linux.ring import PacketRing


class ReplayRing:
    """What capture.record_frames and terminate.py ask of a PacketRing."""

    def __init__(self, blocks: bytearray, block_size: int):
        self.map, self.view = blocks, memoryview(blocks)
        self.block_size, self.block_count = block_size, len(blocks) // block_size

    def blocks(self, should_stop, on_idle=None, drain_limit=None):
        for offset in self.block_offsets(should_stop):
            yield PacketRing._frames(self, offset)

    def block_offsets(self, should_stop, on_idle=None, drain_limit=None):
        return range(0, self.block_count * self.block_size, self.block_size)

    def statistics(self):
        return 0, 0, 0  # nothing dropped: there is no kernel side

    def rebind_if_recreated(self):
        pass
