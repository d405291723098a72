"""userfaultfd and PAGEMAP_SCAN (post-6.1 constants declared by hand)."""

INCLUDES = """
#include <sys/ioctl.h>
"""

TYPES = """
"""

FUNCTIONS = """
"""

CUSTOMIZATIONS = """
"""
