// Distributor Chat's service worker: notifications, and an offline page when
// the server cannot be reached. It caches nothing else: no API answer, photo
// or page, since those belong to whoever is signed in.
'use strict'

const OFFLINE_CACHE = 'distributor-chat-offline-v1'
const OFFLINE_URL = '/distributor/static/offline.html'
const OFFLINE_FILES = [OFFLINE_URL, '/distributor/static/css/distributor_chat.css',
  '/distributor/static/icons/icon-192.png']
const ROOMS_URL = '/distributor/chat/rooms'
const ROOM_ID = /^pt_[1-9][0-9]{0,17}$/

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(OFFLINE_CACHE).then((cache) => cache.addAll(OFFLINE_FILES))
    .then(() => self.skipWaiting()))
})

self.addEventListener('activate', (event) => {
  event.waitUntil(caches.keys()
    .then((names) => Promise.all(names.filter((name) => name !== OFFLINE_CACHE).map((name) => caches.delete(name))))
    .then(() => self.clients.claim()))
})

// A page that cannot be loaded (the server is down, or the phone is offline)
// shows the offline page; everything else goes to the network untouched.
self.addEventListener('fetch', (event) => {
  if (event.request.mode !== 'navigate') return
  event.respondWith(fetch(event.request).catch(() => caches.match(OFFLINE_URL)))
})

async function setBadge (count) {
  try {
    if (count > 0 && self.navigator.setAppBadge) await self.navigator.setAppBadge(count)
    else if (self.navigator.clearAppBadge) await self.navigator.clearAppBadge()
  } catch (error) { /* a badge is a nicety: no platform promises one */ }
}

// The page for a room (a URL of this origin only), or the room list.
function roomUrl (roomId) {
  const path = ROOM_ID.test(roomId || '') ? `/distributor/chat?room_id=${roomId}` : ROOMS_URL
  return new URL(path, self.location.origin).href
}

async function showPush (push) {
  if (push.type === 'read') { // read elsewhere: nothing is waiting any more
    const shown = await self.registration.getNotifications()
    shown.forEach((notification) => notification.close())
    await setBadge(0)
    return
  }
  if (push.type !== 'message') return
  // One notification per room: a newer message replaces the older one.
  await self.registration.showNotification(push.sender_name || 'Distributor Chat', {
    body: push.preview || '',
    tag: push.room_id,
    renotify: true,
    icon: '/distributor/static/icons/icon-192.png',
    data: { room_id: push.room_id, message_id: push.message_id },
  })
  await setBadge(push.unread_total)
}

self.addEventListener('push', (event) => {
  let push = null
  try { push = event.data ? event.data.json() : null } catch (error) { push = null }
  if (push) event.waitUntil(showPush(push))
})

// The window already on that room, if one is open.
async function roomWindow (roomId) {
  const url = roomUrl(roomId)
  const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true })
  return windows.find((client) => client.url === url) || null
}

// A tap focuses a window already on that room, or opens one.
async function openRoom (roomId) {
  const open = await roomWindow(roomId)
  return open ? open.focus() : self.clients.openWindow(roomUrl(roomId))
}

self.addEventListener('notificationclick', (event) => {
  event.notification.close()
  event.waitUntil(openRoom(event.notification.data && event.notification.data.room_id))
})

self.distributorChat = { roomUrl, roomWindow, showPush } // for tests, through the DevTools protocol
