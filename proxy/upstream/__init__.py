"""The upstream client: Parkway's own h11 connections for proxied exchanges, their pool, the SSRF guard, and httpx2 for Parkway's own calls."""
