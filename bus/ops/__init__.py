"""Operating the bus: the nats-server launcher, identities, certificates, permissions, log archives."""
