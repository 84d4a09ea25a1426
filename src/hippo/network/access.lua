-- HippoVolume access filter for Orthanc's HTTP server (REST API, DICOMweb, Orthanc Explorer).
--
-- Loaded through "LuaScripts" (before routing.lua) in the orthanc.json that
-- hippo.network.orthanc.write_config writes; that function puts a header above this text that sets
--   HIPPO_ALLOWED_HOSTS  set of accepted Host header values, lower case ("127.0.0.1:8042" = true,
--                        "localhost:8042" = true, and the viewer's "127.0.0.1:3000"/"localhost:3000",
--                        whose proxy forwards the browser's Host so that DICOMweb links point at it)
--   HIPPO_OWN_ORIGINS    set of Orthanc's own origins ("http://127.0.0.1:8042" = true, ...)
--
-- Orthanc (1.10) calls IncomingHttpRequestFilter for every HTTP request that passed its own checks
-- (RemoteAccessAllowed, HTTP Basic authentication: a request without valid credentials has
-- already been answered 401); returning false answers 403. Internal calls (Lua RestApiGet/Post,
-- plugins) do not go through it. Header names arrive in lower case; `uri` carries no query string;
-- `method` is the method after Orthanc's method faking (a GET with "?_method=DELETE" or an
-- "X-HTTP-Method-Override" header arrives here as DELETE).
--
-- Rules:
--   1. Host must be one of HIPPO_ALLOWED_HOSTS (defeats DNS rebinding: a page on evil.example
--      whose name now resolves to 127.0.0.1 still sends "Host: evil.example:8042").
--   2. Any method other than GET/HEAD/OPTIONS (i.e. anything that changes state) is refused when
--      the request shows it comes from a web page of another origin:
--        * an Origin header that is not one of HIPPO_OWN_ORIGINS ("null" included);
--        * a Sec-Fetch-Site header other than "same-origin" or "none" (browsers send it even on a
--          plain <img>/<form> request, which carries no Origin for a faked GET ?_method=DELETE);
--        * a Referer that is not under one of HIPPO_OWN_ORIGINS.
--      Non-browser clients (our OrthancClient, curl, storescu's REST peers) send none of these.
--
-- Orthanc has one Lua context shared with routing.lua: this function does a few table lookups and
-- string comparisons only. A refusal is logged (method, path, reason; never a header value).

local ALLOWED_HOSTS = HIPPO_ALLOWED_HOSTS or {}
local OWN_ORIGINS = HIPPO_OWN_ORIGINS or {}
local SAFE_METHODS = { GET = true, HEAD = true, OPTIONS = true }

local function HippoRefuse(method, uri, reason)
  print('HippoVolume access: refused ' .. tostring(method) .. ' ' .. string.sub(tostring(uri), 1, 120)
        .. ': ' .. reason)
  return false
end

local function HippoUnderOwnOrigin(url)
  for origin, _ in pairs(OWN_ORIGINS) do
    if url == origin or string.sub(url, 1, string.len(origin) + 1) == origin .. '/' then
      return true
    end
  end
  return false
end

-- The decision, separate from Orthanc's callback so that it can be tested on its own.
-- Returns (true, nil) or (false, reason).
function HippoAccessDecision(method, headers)
  headers = headers or {}
  local host = headers['host']
  if host == nil or ALLOWED_HOSTS[string.lower(host)] ~= true then
    return false, 'unexpected Host header'
  end
  if SAFE_METHODS[string.upper(tostring(method))] == true then
    return true, nil
  end
  local origin = headers['origin']
  if origin ~= nil and OWN_ORIGINS[string.lower(origin)] ~= true then
    return false, 'cross-origin ' .. tostring(method) .. ' (Origin)'
  end
  local site = headers['sec-fetch-site']
  if site ~= nil then
    site = string.lower(site)
    if site ~= 'same-origin' and site ~= 'none' then
      return false, 'cross-origin ' .. tostring(method) .. ' (Sec-Fetch-Site)'
    end
  end
  local referer = headers['referer']
  if referer ~= nil and not HippoUnderOwnOrigin(string.lower(referer)) then
    return false, 'cross-origin ' .. tostring(method) .. ' (Referer)'
  end
  return true, nil
end

function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local allowed, reason = HippoAccessDecision(method, httpHeaders)
  if not allowed then
    return HippoRefuse(method, uri, reason)
  end
  return true
end
