"""The data caictl reads and writes: record schemas (records), their readers (reading) and resumable writers
(writing), conversations and transcripts, chat formats read back into messages, control text kept as data,
constitutions and the constraints a prompt carries."""
