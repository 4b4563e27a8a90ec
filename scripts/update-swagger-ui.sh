#!/usr/bin/env bash
# Refreshes the Swagger UI assets that /docs serves (embedded in the binary, so /docs works offline).
set -euo pipefail
version="${1:-5.35.0}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$version" >/dev/null && tar xzf swagger-ui-dist-*.tgz)
dest="$repo/assets/swagger-ui"
for file in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png LICENSE NOTICE; do
  cp "$work/package/$file" "$dest/$file"
done
echo "swagger-ui-dist $version from the npm registry (Apache-2.0). Refresh with scripts/update-swagger-ui.sh." > "$dest/VERSION"
