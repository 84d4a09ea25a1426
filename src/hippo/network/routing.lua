-- HippoVolume auto-routing for Orthanc (1.10+): send the input series of stable studies (HippoCrop,
-- else whole-head T1 candidates) to the AI, again whenever such a series has changed since it was
-- sent, and never the AI's own results.
--
-- Loaded through "LuaScripts" in the orthanc.json that hippo.network.orthanc.write_config writes;
-- that function puts a header above this text that sets
--   HIPPO_ROUTE_TO     the DicomModalities name of the AI listener (default "hippoai")
--   HIPPO_ROUTE_SCOPE  "series" (default) or "study"
-- and declares the user metadata HIPPO_ROUTED_METADATA ("HippoRouted") in "UserMetadata".
--
-- Rule (the network contract): when a study becomes stable (no new instance for StableAge s),
--   1. Result series are never inputs: SeriesDescription containing "research use", or one of our
--      SeriesNumbers 9001-9004 with Modality SEG, SR, OT (the report is a Secondary Capture) or KO
--      (the IOCM rejection note).
--   2. Inputs: its HippoCrop series (SeriesDescription containing "HippoCrop", case-insensitive);
--      when there is none, its whole-head T1 candidates (below); none: not sent.
--   3. Each input series has a fingerprint: its number of instances and a hash of its sorted
--      Orthanc instance ids. When an input is sent, its fingerprint is stored in the series'
--      metadata HippoRouted (in Orthanc's database: it survives restarts). An input is sent again
--      only when its fingerprint differs from the stored one -- e.g. the rest of a series that
--      arrived in two parts. The listener then decides: instances it has measured already are
--      dropped as duplicates; new ones make it measure the whole study again and reject its
--      earlier result with an IOCM note (hippo.network.listener).
--   4. No loop: our results (and the rejection note) arriving make the study stable again, but they
--      are not inputs and do not change any input's fingerprint, so nothing is sent. Each input
--      version is sent at most once.
--   5. A study that holds results but whose input series carry no HippoRouted record (imported
--      with its results, or routed before this rule existed): the inputs' fingerprints are recorded
--      and nothing is sent (as before: a study with results is not measured again), so only
--      instances added later make it go to the AI.
--   6. The changed inputs are C-STOREd to HIPPO_ROUTE_TO as one asynchronous Orthanc job
--      (POST /modalities/<name>/store); scope "study" sends the whole study instead.
--
-- Whole-head T1 candidates (lenient: the listener makes the final choice from the DICOM attributes
-- -- MRAcquisitionType, ContrastBolusAgent, ImageType...; conf/series/wholehead/t1.yaml):
--   * Modality MR, and neither SeriesDescription nor ProtocolName names a localizer (locali, scout,
--     survey, aahead) or another weighting or technique (flair, t2, dwi, dti, diff, adc, swi, tof,
--     phase, bold, ep2d);
--   * and a name marks a T1 sequence (t1, mprage, mp-rage, spgr, bravo, tfe, fl3d, mp2rage), or the
--     series is a 3D acquisition: MRAcquisitionType "3D" from Orthanc's series tags when it has it,
--     else read from one instance of the series (Orthanc 1.10 does not index that tag; one small
--     read per MR series that the names leave undecided).
--   Contrast is not a reason to refuse here: "MPRAGE_EnchancedContrast" (a Siemens protocol name)
--   is a plain T1, and whether a T1 was acquired after a contrast agent is in ContrastBolusAgent,
--   which the listener checks.
--   Distractor traffic stays bounded: localizers and the other weightings of a brain protocol
--   (T2, FLAIR, diffusion, SWI, TOF, BOLD) are never sent, and at most HIPPO_MAX_HEAD_SERIES
--   (default 4) candidates per study are, those named as T1 first, then by SeriesNumber. A T1
--   candidate is sent only when the study has no HippoCrop series.
--
-- Series-only routing by default: the listener only needs the input series, so only those
-- series are sent -- far fewer bytes than the full study (distractor T1/FLAIR/T2 series are much
-- larger than the crop). HIPPO_ROUTE_SCOPE = "study" sends the whole study instead.
--
-- If the listener is down when a study becomes stable, the job fails and is not retried (Orthanc
-- logs it; GET /jobs shows it): resubmit with POST /jobs/<id>/resubmit, or send the series again
-- with POST /modalities/hippoai/store. (The fingerprint is stored when the job is submitted.)
--
-- Orthanc runs Lua callbacks in one context, one at a time: this callback only reads the series
-- list (and, for undecided MR series, one tag of one instance), stores the fingerprints and submits
-- a job; the transfer itself runs asynchronously in Orthanc's job engine.
-- Log lines name Orthanc resource ids (hashes), never patient data.

local ROUTE_TO = HIPPO_ROUTE_TO or 'hippoai'
local ROUTE_SCOPE = HIPPO_ROUTE_SCOPE or 'series'
local ROUTED_METADATA = HIPPO_ROUTED_METADATA or 'HippoRouted'
local MAX_HEAD_SERIES = tonumber(HIPPO_MAX_HEAD_SERIES) or 4
local INPUT_MARKER = 'hippocrop'
local RESULT_MARKER = 'research use'
local RESULT_SERIES_NUMBERS = { ['9001'] = true, ['9002'] = true, ['9003'] = true, ['9004'] = true }
local RESULT_MODALITIES = { SEG = true, SR = true, OT = true, KO = true }
local T1_MARKERS = { 't1', 'mprage', 'mp-rage', 'spgr', 'bravo', 'tfe', 'fl3d', 'mp2rage' }
local LOCALIZER_MARKERS = { 'locali', 'scout', 'survey', 'aahead' }
local OTHER_WEIGHTING_MARKERS = { 'flair', 't2', 'dwi', 'dti', 'diff', 'adc', 'swi', 'tof', 'phase', 'bold',
                                  'ep2d' }

-- Fingerprints stored here only when Orthanc refused the metadata (lost at restart).
local routedFallback = {}

local function Contains(text, needle)
  return text ~= nil and string.find(string.lower(tostring(text)), needle, 1, true) ~= nil
end

local function Trim(text)
  return (string.gsub(tostring(text or ''), '^%s*(.-)%s*$', '%1'))
end

local function ContainsAny(text, needles)
  for _, needle in ipairs(needles) do
    if Contains(text, needle) then
      return true
    end
  end
  return false
end

-- Is this series one of the AI's results (or its rejection note)?
function HippoIsResultSeries(tags)
  if Contains(tags['SeriesDescription'], RESULT_MARKER) then
    return true
  end
  local number = Trim(tags['SeriesNumber'])
  local modality = string.upper(Trim(tags['Modality']))
  return RESULT_SERIES_NUMBERS[number] == true and RESULT_MODALITIES[modality] == true
end

-- Could this series be a whole-head 3D T1? Returns 'name' (a name marks a T1), '3d' (a 3D
-- acquisition without a T1 name) or nil. acquisitionType() is called only when the names leave it
-- undecided and the series' tags do not hold MRAcquisitionType.
function HippoWholeHeadCandidate(tags, acquisitionType)
  if string.upper(Trim(tags['Modality'])) ~= 'MR' then
    return nil
  end
  local names = { tags['SeriesDescription'], tags['ProtocolName'] }
  local t1 = false
  for _, name in pairs(names) do
    if ContainsAny(name, LOCALIZER_MARKERS) or ContainsAny(name, OTHER_WEIGHTING_MARKERS) then
      return nil
    end
    t1 = t1 or ContainsAny(name, T1_MARKERS)
  end
  if t1 then
    return 'name'
  end
  local kind = tags['MRAcquisitionType']
  if kind == nil and acquisitionType ~= nil then
    kind = acquisitionType()
  end
  if string.upper(Trim(kind)) == '3D' then
    return '3d'
  end
  return nil
end

-- Kept for callers of the earlier API: true for any candidate.
function HippoIsWholeHeadT1(tags, acquisitionType)
  return HippoWholeHeadCandidate(tags, acquisitionType) ~= nil
end

-- "<number of instances>:<hash of the sorted instance ids>" (two 31-bit polynomial hashes).
function HippoSeriesFingerprint(series)
  local ids = {}
  for _, id in ipairs(series['Instances'] or {}) do
    table.insert(ids, tostring(id))
  end
  table.sort(ids)
  local h1, h2 = 7, 11
  for _, id in ipairs(ids) do
    for i = 1, #id do
      local b = string.byte(id, i)
      h1 = (h1 * 31 + b) % 2147483647
      h2 = (h2 * 131 + b) % 2147483629
    end
    h1 = (h1 * 31 + 59) % 2147483647   -- a separator, so that ids cannot run into each other
    h2 = (h2 * 131 + 59) % 2147483629
  end
  return string.format('%d:%08x%08x', #ids, math.floor(h1), math.floor(h2))
end

local function InstanceCount(fingerprint)
  return tonumber(string.match(tostring(fingerprint or ''), '^(%d+):')) or 0
end

local function SeriesNumberOf(series)
  return tonumber(Trim((series['MainDicomTags'] or {})['SeriesNumber'])) or math.huge
end

-- The routing decision for a study's expanded series list (GET /studies/<id>/series).
--   routedOf(seriesId)      -> the stored fingerprint of that series, or nil
--   acquisitionTypeOf(series) -> its MRAcquisitionType ('3D', '2D', nil when unknown)
-- Returns send, record, reason:
--   send   list of { id = seriesId, fingerprint = ..., was = stored fingerprint or nil } to C-STORE
--          (their fingerprints are to be stored once the job is submitted);
--   record the same for inputs whose fingerprint is to be stored without sending (rule 5);
--   reason why nothing is sent (nil when something is).
function HippoRoutingDecision(seriesList, routedOf, acquisitionTypeOf)
  local resultId = nil
  local crops, others = {}, {}
  for _, series in ipairs(seriesList) do
    local tags = series['MainDicomTags'] or {}
    if HippoIsResultSeries(tags) then
      resultId = resultId or series['ID']
    elseif Contains(tags['SeriesDescription'], INPUT_MARKER) then
      table.insert(crops, series)
    else
      table.insert(others, series)
    end
  end

  local inputs = crops
  local what = 'HippoCrop'
  if #crops == 0 then
    what = 'whole-head T1 candidate'
    local named, threeD = {}, {}
    for _, series in ipairs(others) do
      local lookup = nil
      if acquisitionTypeOf ~= nil then
        lookup = function() return acquisitionTypeOf(series) end
      end
      local kind = HippoWholeHeadCandidate(series['MainDicomTags'] or {}, lookup)
      if kind == 'name' then
        table.insert(named, series)
      elseif kind == '3d' then
        table.insert(threeD, series)
      end
    end
    local bySeriesNumber = function(a, b)
      local na, nb = SeriesNumberOf(a), SeriesNumberOf(b)
      if na ~= nb then
        return na < nb
      end
      return tostring(a['ID']) < tostring(b['ID'])
    end
    table.sort(named, bySeriesNumber)
    table.sort(threeD, bySeriesNumber)
    inputs = {}
    for _, group in ipairs({ named, threeD }) do
      for _, series in ipairs(group) do
        if #inputs < MAX_HEAD_SERIES then
          table.insert(inputs, series)
        end
      end
    end
  end
  if #inputs == 0 then
    return {}, {}, 'no HippoCrop or whole-head T1 series'
  end

  local send, record, unchanged = {}, {}, {}
  for _, series in ipairs(inputs) do
    local fingerprint = HippoSeriesFingerprint(series)
    local stored = nil
    if routedOf ~= nil then
      stored = routedOf(series['ID'])
    end
    local entry = { id = series['ID'], fingerprint = fingerprint, was = stored }
    if stored == fingerprint then
      table.insert(unchanged, series['ID'] .. ': ' .. InstanceCount(fingerprint) .. ' instances')
    elseif stored == nil and resultId ~= nil then
      table.insert(record, entry)
    else
      table.insert(send, entry)
    end
  end
  if #send > 0 then
    return send, record, nil
  end
  if #record > 0 then
    return send, record, 'a result series is already there (series ' .. resultId .. ') and its ' .. what
                         .. ' series were never routed by this PACS: their instances are recorded, so only '
                         .. 'instances added later are sent'
  end
  return send, record, what .. ' series unchanged since routed (' .. table.concat(unchanged, ', ') .. ')'
end

-- ------------------------------------------------------------------------------ Orthanc side

local function ReadRouted(seriesId)
  -- all of the series' metadata at once: asking for an absent name makes Orthanc log an error
  local ok, all = pcall(function()
    return ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata?expand'))
  end)
  if ok and type(all) == 'table' and all[ROUTED_METADATA] ~= nil and all[ROUTED_METADATA] ~= '' then
    return Trim(all[ROUTED_METADATA])
  end
  return routedFallback[seriesId]
end

local function WriteRouted(studyId, seriesId, fingerprint)
  local ok, answer = pcall(RestApiPut, '/series/' .. seriesId .. '/metadata/' .. ROUTED_METADATA, fingerprint)
  if not ok or answer == nil then
    routedFallback[seriesId] = fingerprint
    print('HippoVolume routing: study ' .. studyId .. ': series ' .. seriesId .. ': metadata ' .. ROUTED_METADATA
          .. ' not stored (' .. tostring(answer) .. '; is it in UserMetadata?): remembered until Orthanc restarts')
  end
end

local function ReadAcquisitionType(series)
  local first = (series['Instances'] or {})[1]
  if first == nil then
    return nil
  end
  local ok, value = pcall(RestApiGet, '/instances/' .. first .. '/content/0018-0023')
  if ok and value ~= nil then
    return Trim(string.gsub(value, '%z', ''))
  end
  return nil
end

function OnStableStudy(studyId, tags, metadata)
  local ok, seriesList = pcall(function()
    return ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  end)
  if not ok or type(seriesList) ~= 'table' then
    print('HippoVolume routing: study ' .. studyId .. ': cannot list its series: ' .. tostring(seriesList))
    return
  end

  local decided, send, record, reason = pcall(HippoRoutingDecision, seriesList, ReadRouted, ReadAcquisitionType)
  if not decided then
    print('HippoVolume routing: study ' .. studyId .. ': routing decision failed: ' .. tostring(send))
    return
  end
  for _, entry in ipairs(record) do
    WriteRouted(studyId, entry.id, entry.fingerprint)
  end
  if #send == 0 then
    print('HippoVolume routing: study ' .. studyId .. ' not sent: ' .. reason)
    return
  end

  local resources, described = {}, {}
  for _, entry in ipairs(send) do
    table.insert(resources, entry.id)
    local count = InstanceCount(entry.fingerprint)
    if entry.was == nil then
      table.insert(described, entry.id .. ' (' .. count .. ' instances)')
    else
      table.insert(described, entry.id .. ' (' .. count .. ' instances, changed since routed with '
                              .. InstanceCount(entry.was) .. ')')
    end
  end
  if ROUTE_SCOPE == 'study' then
    resources = { studyId }
  end
  local request = DumpJson({ Resources = resources, Asynchronous = true }, true)
  local sent, answer = pcall(function()
    return RestApiPost('/modalities/' .. ROUTE_TO .. '/store', request)
  end)
  if not sent or answer == nil then
    print('HippoVolume routing: study ' .. studyId .. ': submitting the store job to ' .. ROUTE_TO
          .. ' failed: ' .. tostring(answer))
    return
  end
  for _, entry in ipairs(send) do
    WriteRouted(studyId, entry.id, entry.fingerprint)
  end
  local job = '?'
  local parsed, decoded = pcall(ParseJson, answer)
  if parsed and type(decoded) == 'table' and decoded['ID'] ~= nil then
    job = decoded['ID']
  end
  print('HippoVolume routing: study ' .. studyId .. ' -> ' .. ROUTE_TO .. ' (' .. ROUTE_SCOPE .. ': '
        .. table.concat(described, ', ') .. '), job ' .. job)
end
