"""Tests for mapper, and the fake ActiveCampaign they run against."""
