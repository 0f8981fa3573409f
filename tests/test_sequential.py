"""The sequential cutoff's stream detection on its own (engine tier)."""

from types import SimpleNamespace

from zblock.sequential import SequentialCutoff

MIB_PAGES = 256


def cutoff(mib: int) -> SequentialCutoff:
    return SequentialCutoff(SimpleNamespace(sequential_cutoff=mib << 20))


def test_a_stream_passes_the_cutoff_and_interleaved_streams_are_told_apart():
    cut = cutoff(2)
    a, b = 0, 64 * MIB_PAGES
    for k in range(2):              # two streams of 1 MiB stores, interleaved: 2 MiB each
        assert not cut.bypass(a + k * MIB_PAGES, MIB_PAGES)
        assert not cut.bypass(b + k * MIB_PAGES, MIB_PAGES)
    assert cut.bypass(a + 2 * MIB_PAGES, MIB_PAGES)
    assert cut.bypass(b + 2 * MIB_PAGES, MIB_PAGES)
    assert not cut.bypass(a + 10 * MIB_PAGES, MIB_PAGES)     # a jump starts a new stream


def test_two_stores_of_a_stream_stored_the_other_way_round_join_it():
    """The write-behind queue's two workers may store the 4th MiB before the 3rd."""
    cut = cutoff(4)
    assert not cut.bypass(0, MIB_PAGES)
    assert not cut.bypass(MIB_PAGES, MIB_PAGES)
    assert not cut.bypass(3 * MIB_PAGES, MIB_PAGES)      # on its own so far: 1 MiB
    assert not cut.bypass(2 * MIB_PAGES, MIB_PAGES)      # joins both sides: 4 MiB, not past it
    assert cut.bypass(4 * MIB_PAGES, MIB_PAGES)          # 5 MiB


def test_off_is_off():
    cut = cutoff(0)
    for k in range(8):
        assert not cut.bypass(k * MIB_PAGES, MIB_PAGES)
