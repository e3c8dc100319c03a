"""The data caictl reads and writes: records (JSONL readers and writers), conversations and transcripts, chat
formats read back into messages, control text kept as data, constitutions and the constraints a prompt carries."""
