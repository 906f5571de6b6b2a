"""taskray package."""
