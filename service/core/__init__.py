"""The moderation logic: event → image → guard → answer → verdict, with no I/O of its own.

Read in the order the data flows: `events` (the inbound contract), `images` (decode, limits),
`policies` (policy files, the prompt, reading the guard's answer), `guard` (what the pipeline
asks of a guard model), `verdicts` (the outbound contract), `pipeline` (one record in, one
verdict or dead letter out). `errors` is the tree of every way an event fails. The core imports
nothing from `service.adapters`: Kafka, Triton and HTTP are passed in behind small protocols,
so all of it runs in unit tests with fakes.
"""
