"""The NATS side of the bus: connections, the JetStream client wrapper, consumers, followers, stream set-up."""
