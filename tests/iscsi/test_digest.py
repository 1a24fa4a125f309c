"""CRC32C digests: known vectors and wire byte order (RFC 7143 12.1, RFC 3720 B.4)."""

from prmigrate.iscsi.digest import crc32c, digest_bytes, wire_value


def test_32_zero_bytes():
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert digest_bytes(bytes(32)) == bytes.fromhex("aa36918a")


def test_32_ff_bytes():
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


def test_incrementing_and_decrementing():
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_parts_equal_whole_and_wire_value():
    data = bytes(range(200))
    assert digest_bytes(data[:7], b"", data[7:]) == digest_bytes(data)
    assert crc32c(data[50:], crc32c(data[:50])) == crc32c(data)
    assert wire_value(digest_bytes(data)) == crc32c(data)
