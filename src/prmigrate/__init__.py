"""prmigrate: live migration of SCSI persistent reservations."""

__version__ = "0.1.0"
