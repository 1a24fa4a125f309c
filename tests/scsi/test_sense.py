

def test_sense_triple_and_unit_attention_of() -> None:
    from prmigrate.scsi.sense import Sense, encode_sense, sense_triple, unit_attention_of

    fixed = encode_sense(Sense.RESERVATIONS_PREEMPTED)
    desc = encode_sense(Sense.REGISTRATIONS_PREEMPTED, descriptor=True)
    assert sense_triple(fixed) == (0x06, 0x2A, 0x03)
    assert unit_attention_of(fixed) == (0x2A, 0x03)
    assert unit_attention_of(memoryview(desc)) == (0x2A, 0x05)
    assert unit_attention_of(encode_sense(Sense.INVALID_FIELD_IN_CDB)) is None
    assert sense_triple(b"\x70\x00") is None and unit_attention_of(b"") is None
